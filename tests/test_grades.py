"""Grade parsing, label maps and the clinical CSV reader."""

from __future__ import annotations

import zipfile

import pytest
from scripts.grades import canonical_grade, grade_to_label, normalise_id, read_grades

LGG_HGG = {"LGG": 0, "HGG": 1}
LGG_HGG_ALIASES = {"II": "LGG", "III": "HGG", "IV": "HGG"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("II", "II"),
        ("III", "III"),
        ("IV", "IV"),
        ("2", "II"),
        ("3", "III"),
        ("4", "IV"),
        ("4.0", "IV"),
        (3, "III"),
        ("grade II", "II"),
        ("Grade 3", "III"),
        ("  grade-iv ", "IV"),
        ("G2", "II"),
        ("g4", "IV"),
        ("GIII", "III"),
        ("WHO III", "III"),
        ("WHO grade 2", "II"),
        ("GBM", "IV"),
        ("glioblastoma", "IV"),
        ("Glioblastoma  Multiforme", "IV"),
    ],
)
def test_canonical_grade_spellings(value, expected):
    assert canonical_grade(value) == expected


@pytest.mark.parametrize("value", ["", "  ", None, "NA", "n/a", "NaN", "unknown", "-", "None"])
def test_missing_values_mean_no_grade(value):
    assert canonical_grade(value) is None
    assert grade_to_label(value) == (None, None, "missing grade")


def test_unknown_value_is_reported_not_raised():
    grade, label, problem = grade_to_label("oligo?")
    assert grade is None and label is None
    assert "unrecognised" in problem and "oligo?" in problem


def test_default_label_map():
    assert grade_to_label("grade II") == ("II", 0, "")
    assert grade_to_label("3") == ("III", 1, "")
    assert grade_to_label("GBM") == ("IV", 2, "")


def test_grade_outside_label_map_is_unrecognised():
    grade, label, problem = grade_to_label("I")
    assert label is None and "unrecognised" in problem


def test_alias_map_for_lgg_hgg():
    assert canonical_grade("2", LGG_HGG_ALIASES) == "LGG"
    assert canonical_grade("GBM", LGG_HGG_ALIASES) == "HGG"
    assert grade_to_label("WHO III", LGG_HGG, LGG_HGG_ALIASES) == ("HGG", 1, "")
    assert grade_to_label("grade 2", LGG_HGG, LGG_HGG_ALIASES) == ("LGG", 0, "")


def test_label_map_key_accepted_as_is():
    assert grade_to_label("hgg", LGG_HGG) == ("HGG", 1, "")
    assert grade_to_label("LGG", LGG_HGG) == ("LGG", 0, "")


def test_user_alias_on_raw_value_wins():
    assert canonical_grade("low grade", {"low grade": "II"}) == "II"
    assert grade_to_label("Low  Grade", None, {"LOW GRADE": "II"}) == ("II", 0, "")


def test_normalise_id():
    assert normalise_id("  hf0899 ") == normalise_id("HF0899") == "HF0899"


def _write(tmp_path, text, name="grades.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_read_grades_bom_whitespace_and_case(tmp_path):
    path = _write(tmp_path, " sample , GRADE \nP1, II\n p2 ,grade 3\nP3,GBM\n", encoding="utf-8-sig")
    table = read_grades(path)
    assert {k: (v.grade, v.label) for k, v in table.grades.items()} == {
        "P1": ("II", 0),
        "P2": ("III", 1),
        "P3": ("IV", 2),
    }
    assert table.lookup(" P2") is not None
    assert table.lookup("p3").patient_id == "P3"


def test_read_grades_custom_columns_and_semicolons(tmp_path):
    path = _write(tmp_path, "Patient;Diagnosis;WHO\nA1;astro;2\nA2;gbm;4\n")
    table = read_grades(path, patient_column="Patient", grade_column="WHO")
    assert table.lookup("a1").grade == "II" and table.lookup("A2").grade == "IV"


def test_missing_and_unrecognised_grades_reported(tmp_path):
    path = _write(tmp_path, "Sample,Grade\nP1,II\nP2,\nP3,NA\nP4,weird\n,III\n")
    table = read_grades(path)
    assert set(table.grades) == {"P1"}
    assert table.without_grade["P2"] == "missing grade"
    assert table.without_grade["P3"] == "missing grade"
    assert "unrecognised" in table.without_grade["P4"]
    assert table.rows_without_patient == 1
    assert table.problem("P4").startswith("unrecognised")
    assert table.problem("NOBODY") == "not in the grades CSV"


def test_duplicate_rows_same_grade_merge_and_conflicts_excluded(tmp_path):
    path = _write(tmp_path, "Sample,Grade\nP1,II\nP1,grade 2\nP2,III\np2,IV\nP3,\nP3,IV\n")
    table = read_grades(path)
    assert table.lookup("P1").grade == "II"
    assert table.lookup("P2") is None
    assert table.conflicting["P2"] == ["III", "IV"]
    assert "conflicting grades III, IV" == table.problem("P2")
    assert table.lookup("P3").grade == "IV"  # an empty duplicate row does not conflict


def test_conflict_uses_mapped_classes(tmp_path):
    path = _write(tmp_path, "Sample,Grade\nP1,III\nP1,IV\n")
    table = read_grades(path, label_map=LGG_HGG, grade_aliases=LGG_HGG_ALIASES)
    assert table.lookup("P1").grade == "HGG" and not table.conflicting


def test_missing_column_error_names_file_and_columns(tmp_path):
    path = _write(tmp_path, "ID,WHO\nP1,II\n")
    with pytest.raises(ValueError) as err:
        read_grades(path)
    message = str(err.value)
    assert str(path) in message and "'ID'" in message and "'WHO'" in message and "Sample" in message


def test_ambiguous_column_error(tmp_path):
    path = _write(tmp_path, "sample,SAMPLE,Grade\nP1,P1,II\n")
    with pytest.raises(ValueError, match="ambiguous"):
        read_grades(path, patient_column="Sample")


def test_exact_column_match_wins_over_case_insensitive(tmp_path):
    path = _write(tmp_path, "Sample,SAMPLE,Grade\nP1,X9,II\n")
    assert read_grades(path).lookup("P1").grade == "II"


def test_missing_csv_raises_with_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_grades(tmp_path / "nope.csv")


def test_quoted_multiline_cells(tmp_path):
    path = _write(tmp_path, 'Sample,Grade,Notes\nP1,II,"first line\nsecond, line"\nP2,IV,x\n')
    table = read_grades(path)
    assert table.lookup("P1").grade == "II" and table.lookup("P2").grade == "IV" and table.rows == 2


def test_utf16_and_latin1_tables_are_read(tmp_path):
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("Sample,Grade\nHF0001,III\n".encode("utf-16"))  # with its BOM, as Excel writes "Unicode text"
    assert read_grades(utf16).grades["HF0001"].grade == "III"
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("Sample,Grade,Comment\nHF0002,IV,nécrose\n".encode("latin-1"))
    assert read_grades(latin1).grades["HF0002"].grade == "IV"


def test_an_excel_workbook_is_named_as_such(tmp_path):
    workbook = tmp_path / "clinical.xlsx"
    with zipfile.ZipFile(workbook, "w") as archive:  # an .xlsx is a zip of XML parts
        archive.writestr("[Content_Types].xml", "<Types/>")
    with pytest.raises(ValueError, match=r"clinical.xlsx is an Excel workbook, not a CSV.*save .* as CSV"):
        read_grades(workbook)
