"""DIO's wire protocol: Redis key names, message models and Lua scripts, defined once.

Every package (client, dispatcher, gpu_worker, ops) imports these; no key string is spelled
anywhere else.
"""
