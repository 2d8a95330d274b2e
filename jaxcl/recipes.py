"""Kept so that config files written as ``from jaxcl import recipes`` still
load: the recipes live in jaxcl.config.recipes."""

from jaxcl.config.recipes import *  # noqa: F403
