"""The Kubernetes side: the Distillation API, its CRD, and the controller that runs it.

Imports only the light modules of ``distillation_runtime`` (spec, plan), never the ML stack.
"""

__version__ = "0.1.0"
