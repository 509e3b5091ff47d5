"""The caller's saved Hub token (`/v1/hub-token`): write-only, encrypted at rest."""
