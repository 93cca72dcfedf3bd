"""How optimizer state is stored: 8-bit blockwise (``blockwise``); fp32 lives in plain tensors."""
