"""pairdots_server.service.jobs"""
