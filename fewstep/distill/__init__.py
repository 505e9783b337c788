"""Distillation trainers (consistency distillation, f-distill, DisBack, LCSC)."""
