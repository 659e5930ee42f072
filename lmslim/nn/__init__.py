"""Model building blocks shared by the formats (``lmslim.modelio``) and the techniques (``lmslim.compress``).

What lives here describes a model's *modules*, not how they were chosen: the integer grids and the
quantized linear layer, where the transformer blocks are, per-layer block shapes, cross-layer
parameter sharing. A saved folder is rebuilt from these alone, so loading a model never needs the
technique that made it.
"""
