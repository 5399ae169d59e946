"""Integrations with training frameworks.

Each submodule imports its framework, so import the one you use (``amp_fused.integrations.lightning``); this
package itself imports nothing, and ``import amp_fused`` never imports it.
"""
