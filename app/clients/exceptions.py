from app.core.errors import NotFound


class ClientNotFound(NotFound):
    code = "client-not-found"
    title = "Client not found"
