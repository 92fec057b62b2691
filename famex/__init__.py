"""famex: expand one trained language model into a family of smaller, cheaper models.

The package is shaped like the pipeline (see README.md): one subpackage per stage
(`data`, `teacher`, `distill`, `posttrain`, `quant`, `export`, `eval`, `report`, `run`) and the
command-line front end in `cli`.
"""

__version__ = "0.1.0"
