"""`python -m sidrec.service`: serve with settings from SIDREC_* variables (no CLI needed)."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from sidrec.bundle import BundleError
from sidrec.histories_file import HistoriesFileError

from .runtime import ProviderError
from .server import serve
from .settings import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"sidrec serve: bad settings:\n{e}", file=sys.stderr)
        return 2
    try:
        serve(settings)
    except BundleError as e:
        print(f"sidrec serve: cannot load the bundle: {e}", file=sys.stderr)
        return 2
    except ProviderError as e:
        print(f"sidrec serve: {e}", file=sys.stderr)
        return 2
    except HistoriesFileError as e:
        print(f"sidrec serve: SIDREC_HISTORIES: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
