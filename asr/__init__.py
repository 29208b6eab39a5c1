"""Hybrid HMM/DNN speech recognition with ensemble distillation.

Reproduces Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network",
section 4, on LibriSpeech (or the synthetic mini corpus in the same layout).
"""

__version__ = "0.1.0"
