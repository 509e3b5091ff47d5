"""Account-level webhook endpoints and the saved Hub credential."""
