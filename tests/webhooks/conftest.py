from support.scripted_receiver import receiver, tls_receiver  # noqa: F401  (fixtures)
