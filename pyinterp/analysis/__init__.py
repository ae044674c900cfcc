"""The analyses, each a module over the engine's public API: the logit lens (``lens``), direct logit attribution
(``attribution``), patching sweeps and head scans (``patching``), the head detector (``heads``), steering
(``steering``), SAEs (``sae``) and the quantization-fidelity report (``fidelity``)."""
