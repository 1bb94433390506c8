"""Read-only facts about a model: its transformer structure and graph views."""

from xopt.analysis.graph_view import to_networkx
from xopt.analysis.patterns import Embedding, Linear, Norm
from xopt.analysis.structure import MLP, Attention, Block, TransformerStructure, find_transformer_structure

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "Embedding",
    "Linear",
    "Norm",
    "TransformerStructure",
    "find_transformer_structure",
    "to_networkx",
]
