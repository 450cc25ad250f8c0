"""noprop: kernel-accelerated NoProp training (Li, Teh, Pascanu 2025).

Importing noprop registers the fused ops as `torch.ops.noprop.*`; no GPU or Triton driver is
touched until an op runs.
"""
def _source_tree_kernels() -> None:
    """Make `noprop.kernels` importable when running from a source checkout without installing.

    setup.py installs the top-level `kernels/` folder as `noprop.kernels` (package_dir); a plain
    `PYTHONPATH=checkout` run has no such mapping, so point the name at the folder here.
    """
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    src = Path(__file__).resolve().parent.parent / "kernels"
    if (src / "__init__.py").exists():
        spec = importlib.util.spec_from_file_location(name, src / "__init__.py", submodule_search_locations=[str(src)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_source_tree_kernels()

from noprop import ops  # noqa: E402
from noprop.dispatch import use_backend  # noqa: E402
from noprop.embeddings import ClassEmbedding, make_embedding  # noqa: E402
from noprop.models import BackpropDT, CNNClassifier, DTBlock, NoPropDT  # noqa: E402
from noprop.schedule import DTSchedule  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BackpropDT", "CNNClassifier", "ClassEmbedding", "DTBlock", "DTSchedule", "NoPropDT", "make_embedding",
           "ops", "use_backend", "__version__"]
