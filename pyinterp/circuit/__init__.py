"""Circuit tracing on GGUF: transcoders for the MLPs, and attribution graphs of their local replacement model."""
