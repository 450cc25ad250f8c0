from .backprop import BackpropDT
from .blocks import CNNClassifier, ConvBranch, DTBlock, LabelBranch, dt_block_factory
from .continuous import ContinuousLosses, NoPropCT, NoPropFM
from .ct_block import CTBlock, ct_block
from .dropout import Dropout
from .dt import DTLosses, NoPropDT

__all__ = ["BackpropDT", "CNNClassifier", "ContinuousLosses", "ConvBranch", "CTBlock", "DTBlock", "DTLosses", "Dropout",
           "LabelBranch", "NoPropCT", "NoPropDT", "NoPropFM", "ct_block", "dt_block_factory"]
