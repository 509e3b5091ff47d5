from support.hub_fixtures import fake_hub, fake_hub_url  # noqa: F401  (fixtures)
