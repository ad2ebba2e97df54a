"""A Kafka record header as the service passes it around: ``(name, value)``.

Defined once, in a module that imports nothing, so the adapters that write
records, the translators that read them and :mod:`service.tracing` share it
without depending on each other or on a Kafka client.
"""

Header = tuple[str, bytes]
