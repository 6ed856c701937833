"""edgexfer: few labelled images in, a compact, fast, self-describing model for a CPU or a board out.

Stages (each a library function `stage(inputs..., out_dir, config) -> result` with a CLI command of
the same name): data -> finetune -> export -> quantize -> evaluate -> bench -> serve.
"""
__version__ = "0.1.0"
