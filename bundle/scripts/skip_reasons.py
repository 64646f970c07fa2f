"""Skip-reason codes of the DICOM indexer and their human-readable meanings.

A module of its own because three modules share this vocabulary: the header reader reports pixel-data
problems with these codes, the indexer reports everything else, and the datalist report explains them.
"""

from __future__ import annotations

# --- skip reasons (machine-readable codes; the human text goes in "detail") ----------------------------------
REASON_NOT_DICOM = "not_dicom"
REASON_UNREADABLE = "unreadable"
REASON_NON_IMAGE = "non_image"
REASON_NOT_MR = "not_mr"
REASON_LOCALIZER = "localizer"
REASON_NOT_SAGITTAL = "not_sagittal"
REASON_NOT_T1_T2 = "not_t1_t2"
REASON_NOT_T1_FLAIR = "not_t1_flair"
REASON_NOT_T1_PD = "not_t1_pd"
REASON_NOT_T1_UNKNOWN = "not_t1_unknown"
REASON_POST_CONTRAST = "post_contrast_excluded"
REASON_DUPLICATE = "duplicate_sop_instance"
REASON_TRUNCATED = "pixel_data_truncated"
REASON_UNDECODABLE = "pixel_data_undecodable"
REASON_DICOMDIR = "dicomdir"
REASON_MULTI_FRAME = "multi_frame"
REASON_UNLISTABLE = "folder_unreadable"
REASON_LINK_LOOP = "link_loop"
REASON_LOAD_FAILED = "load_failed"

REASON_DESCRIPTIONS: dict[str, str] = {
    REASON_NOT_DICOM: "not a DICOM file",
    REASON_UNREADABLE: "unreadable file (the detail holds the error)",
    REASON_NON_IMAGE: "non-image object: no pixel data, or an SR / presentation state / other non-image SOP class",
    REASON_NOT_MR: "not an MR image",
    REASON_LOCALIZER: "localizer / scout image",
    REASON_NOT_SAGITTAL: "not a sagittal slice",
    REASON_NOT_T1_T2: "not T1-weighted: T2-weighted",
    REASON_NOT_T1_FLAIR: "not T1-weighted: FLAIR",
    REASON_NOT_T1_PD: "not T1-weighted: proton density",
    REASON_NOT_T1_UNKNOWN: "not T1-weighted: weighting unknown (no TR/TE and no hint in the description)",
    REASON_POST_CONTRAST: "post-contrast T1, excluded by include_post_contrast=False",
    REASON_DUPLICATE: "duplicate SOPInstanceUID (the first file by path is kept)",
    REASON_TRUNCATED: "truncated file: pixel data shorter than the header says",
    REASON_UNDECODABLE: "pixel data cannot be decoded (no decoder for its transfer syntax, or corrupt stream)",
    REASON_DICOMDIR: "a DICOMDIR: the index of a DICOM medium, not an image (the images are read from the tree)",
    REASON_MULTI_FRAME: "multi-frame (enhanced) MR: one file holds many frames; only single-slice files are graded",
    REASON_UNLISTABLE: "a folder that cannot be listed (e.g. no read permission): its files were not indexed",
    REASON_LINK_LOOP: "a symbolic link to a folder walked anyway (a loop, or a second link to it): not followed again",
    REASON_LOAD_FAILED: "selected, but its pixels could not be loaded when the run read them (detail: the error)",
}
