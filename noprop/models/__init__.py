from .backprop import BackpropDT
from .blocks import CNNClassifier, ConvBranch, DTBlock, LabelBranch, dt_block_factory
from .dt import DTLosses, NoPropDT

__all__ = ["BackpropDT", "CNNClassifier", "ConvBranch", "DTBlock", "DTLosses", "LabelBranch", "NoPropDT",
           "dt_block_factory"]
