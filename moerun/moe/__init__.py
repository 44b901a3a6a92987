"""Mixture-of-Experts pieces shared by the architectures: routing rules, routed experts, and
the expert cache (residency, compute backends, host stores) that offloads them."""
