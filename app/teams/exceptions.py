from app.core.errors import Conflict, NotFound


class TeamNotFound(NotFound):
    code = "team-not-found"
    title = "Team not found"


class TeamExists(Conflict):
    code = "team-exists"
    title = "Team exists"
