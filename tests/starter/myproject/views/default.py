from pyramid.httpexceptions import HTTPSeeOther
from pyramid.response import Response
from pyramid.view import view_config
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from pyramid_sessioncache import FromCache

from .. import models


@view_config(route_name="home", renderer="tests.starter.myproject:templates/mytemplate.jinja2")
def my_view(request):
    try:
        query = select(models.MyModel).where(models.MyModel.name == "one")
        one = request.cached_query(query).scalar_one()
    except SQLAlchemyError:
        return Response(db_err_msg, content_type="text/plain", status=500)
    return {"one": one, "project": "myproject"}


@view_config(route_name="models", renderer="json", request_method="GET")
def list_models(request):
    """Every model's name, through the ORM hook (a ``FromCache`` option) rather than ``cached_query``."""
    query = select(models.MyModel).order_by(models.MyModel.name).options(FromCache("short_term"))
    return [model.name for model in request.dbsession.scalars(query)]


@view_config(route_name="models", request_method="POST")
def add_model(request):
    """Add a model; pyramid_tm commits when the view returns (unless a test holds the transaction)."""
    request.dbsession.add(models.MyModel(name=request.POST["name"], value=int(request.POST.get("value", 0))))
    return HTTPSeeOther(request.route_url("models"))


db_err_msg = """\
Pyramid is having a problem using your SQL database.  The problem
might be caused by one of the following things:

1.  You may need to initialize your database tables with `alembic`.
    Check your README.txt for descriptions and try to run it.

2.  Your database server may not be running.  Check that the
    database server referred to by the "sqlalchemy.url" setting in
    your "development.ini" file is running.

After you fix the problem, please restart the Pyramid application to
try it again.
"""
