"""The project's package (docs/architecture.md). Installed with `pip install -e .`, it is imported
as `lfkd`, a name no user's own `common` can shadow (`common.alias` says how)."""
if __name__ != "common":  # imported under the installed name
    from pathlib import Path as _Path

    from . import alias as _alias

    _alias.install(__name__, _Path(__file__).parent)
