"""pairdots_server.index"""
