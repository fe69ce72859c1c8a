"""Optional integrations with other libraries.

Each submodule imports its library on import, so ``import selattn_ext`` never does:

    selattn_ext.integrations.transformers   # Hugging Face transformers: attn_implementation="selective"
"""
