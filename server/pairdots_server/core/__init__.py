"""pairdots_server.core"""
