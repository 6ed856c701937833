"""edgexfer: few labelled images in, a compact, fast, self-describing model for a CPU or a board out.

Stages, each a library function `edgexfer.pipeline.NAME(run_dir, cfg=None, ws=None) -> dict` that reads and
writes the run folder under one protocol (`edgexfer.runfolder.stage`): select (`--backbone auto`) -> finetune ->
export -> quantize -> evaluate -> bench; `edgexfer run` chains them and resumes, and each but select (which
`finetune` runs) is a CLI command of the same name. `serve` serves the files they make.
"""
__version__ = "0.1.0"
