"""Files pyinterp reads and writes, each written whole or not at all (``atomic``): tensors (``tensor_io``),
safetensors (``safetensors_io``), CSV tables (``csv_io``) and the F32 copies of quantized models (``dequant``)."""
