from app.core.errors import Conflict, NotFound


class CredentialNotFound(NotFound):
    code = "credential-not-found"
    title = "Credential not found"


class CredentialExists(Conflict):
    code = "credential-exists"
    title = "Credential exists"
