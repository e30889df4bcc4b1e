"""fineinfer-jupyter: fine-tune and serve one model at once, from JupyterLab.

This module only holds the Jupyter and IPython hooks; everything heavy is imported lazily.
"""

__version__ = "0.1.0"


def _jupyter_server_extension_points():
    from .engine.threads import set_wait_policy
    from .server.app import FineInferApp

    set_wait_policy()  # as early as the server lets us, before anything imports torch

    return [{"module": "fineinfer_jupyter", "app": FineInferApp}]


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "fineinfer-jupyter"}]


def load_ipython_extension(ipython):
    from .kernel.magics import load_ipython_extension as load

    load(ipython)
