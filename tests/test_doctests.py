"""Every public docstring example runs (imported by its wavefront.* name, never a bare folder name)."""
import doctest
import importlib
import pkgutil

import pytest



def _modules():
    """Every module under wavefront, subpackages included (wavefront.backends.scans.linear.native...)."""
    names = []
    for pkg in ("wavefront", "wavefront.models", "wavefront.scheduler", "wavefront.passes", "wavefront.backends"):
        mod = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".") if not m.ispkg]
    return sorted(set(names) - {"wavefront.demo", "wavefront.__main__"})  # scripts: importing them runs them


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_package_layout_maps_to_wavefront_names():
    import wavefront.backends
    import wavefront.passes
    import wavefront.scheduler
    assert wavefront.scheduler.__name__ == "wavefront.scheduler"
    assert wavefront.__version__
