"""noprop: kernel-accelerated NoProp training (Li, Teh, Pascanu 2025).

Importing noprop registers the fused ops as `torch.ops.noprop.*`; no GPU or Triton driver is
touched until an op runs.
"""
from noprop import ops
from noprop.dispatch import use_backend
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import BackpropDT, CNNClassifier, DTBlock, NoPropDT
from noprop.schedule import DTSchedule

__version__ = "0.1.0"

__all__ = ["BackpropDT", "CNNClassifier", "ClassEmbedding", "DTBlock", "DTSchedule", "NoPropDT", "make_embedding",
           "ops", "use_backend", "__version__"]
