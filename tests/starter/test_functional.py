"""pyramid-cookiecutter-starter's ``tests/test_functional.py``, unchanged: its home view now caches."""

from .myproject import models


def test_root(testapp, dbsession):
    model = models.MyModel(name="one", value=55)
    dbsession.add(model)
    dbsession.flush()

    testapp.get("/", status=200)


def test_notfound(testapp):
    res = testapp.get("/badurl", status=404)
    assert res.status_code == 404
