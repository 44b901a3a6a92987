"""Recurrent mixers (state-space layers) of the hybrid families."""
