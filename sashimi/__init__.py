"""SaShiMi, mono and stereo, on the Triton kernels of `kernels`: quantisation and data,
the S4 layer, the backbone and heads, training and generation."""

__version__ = "0.1.0"
