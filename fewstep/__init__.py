"""fewstep: few-step diffusion sampling, guidance, distillation and evaluation."""

__version__ = "0.1.0"
