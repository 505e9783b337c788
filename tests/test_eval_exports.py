"""``from fewstep.eval import fd_digits`` (the documented import) gives the function, also after the
submodule of the same name was imported by path (as the CLI and the benchmarks do)."""

import importlib
import types


def test_function_named_submodules_do_not_shadow_the_functions():
    import fewstep.eval

    for name in ("fd_digits", "clip_score"):
        importlib.import_module(f"fewstep.eval.{name}")  # binds the submodule unless the package refuses
        exported = getattr(fewstep.eval, name)
        assert callable(exported) and not isinstance(exported, types.ModuleType), name
        assert exported is getattr(importlib.import_module(f"fewstep.eval.{name}"), name)
    from fewstep.eval.fd_digits import DigitsFeatures  # the submodule stays importable by path

    assert DigitsFeatures.__module__ == "fewstep.eval.fd_digits"
