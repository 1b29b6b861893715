"""Registers a penalty by decorator when imported through its entry point."""
from gradreg.penalties import PENALTIES, make


@PENALTIES.register("toy-gn", origin="gradreg-toy-plugin")
def toy_gn(**params):  # type: ignore[no-untyped-def]
    """Gradient-norm penalty registered by a plugin module."""
    return make("gn", **params)
