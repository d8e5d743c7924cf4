"""Reference Flax (Linen) models that load real Hugging Face checkpoints.

Modules: :mod:`jlora.models.bert`, :mod:`jlora.models.llama`, :mod:`jlora.models.vit`.
Imported lazily so ``import jlora`` stays light.
"""
