"""pairdots_server.perturb"""
