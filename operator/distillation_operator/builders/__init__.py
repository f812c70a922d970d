"""Pure builders: (Distillation, stage, settings) -> the child object as a plain dict.

Nothing here talks to the API server; every builder is tested as data and every built object is
checked against the real upstream CRDs (server-side dry run) and the real KubeRay operator.
"""
