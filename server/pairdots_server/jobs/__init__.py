"""pairdots_server.jobs"""
