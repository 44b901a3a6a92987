"""Mixture-of-Experts pieces shared by the architectures: routing rules and routed experts."""
