"""remat's server: graph IR, op library, autodiff, checkpoint planners, executor, service.

    >>> from remat_server import ServerConfig, create_server
    >>> server, port = create_server(ServerConfig(port=0))
"""
from .app import create_server
from .config import ServerConfig
from .limits import Limits

__all__ = ["Limits", "ServerConfig", "create_server"]
