"""Optional integrations with other libraries.

Each submodule imports its library on import, so ``import selattn_ext`` never does:

    selattn_ext.integrations.transformers   # HF transformers: attn_implementation="selective"
"""
