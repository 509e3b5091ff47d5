import sys
from pathlib import Path

# `tests/` on sys.path so that `support.*` imports (never the repository root: see CONTRIBUTING-ENGINE.md).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.hub_fixtures import fake_hub, fake_hub_url  # noqa: E402,F401  (fixtures)
