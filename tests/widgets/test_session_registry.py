"""Each viewer has exactly one session, shared by every widget."""

from napari_hemofm._widgets._session import get_session


def test_one_session_per_viewer(make_napari_viewer):
    """get_session returns the same object for a viewer and another for another viewer."""
    a = make_napari_viewer()
    b = make_napari_viewer()
    assert get_session(a) is get_session(a)
    assert get_session(a) is not get_session(b)
