"""pairdots_server.rpc"""
